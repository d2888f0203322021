"""Request models: the JSON bodies the converter builds, and validation before the wire."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import orjson
import pytest

from friendli_image import FriendliValidationError, ImageInput
from friendli_image._requests import MAX_SEED, EditRequest, GenerateRequest
from friendli_image._requests import EditRequest as build_edit
from friendli_image._requests import GenerateRequest as build_generate
from friendli_image._serde import dumps_request

URL = "https://example.com/cat.png"


# -- serialization ------------------------------------------------------------------------


def test_generate_body_omits_none_fields() -> None:
    """A minimal generate call sends the prompt and the two spec defaults, no null keys."""
    body = orjson.loads(dumps_request(build_generate(prompt="a lighthouse")))
    assert body == {"prompt": "a lighthouse", "num_inference_steps": 20, "guidance_scale": 0.0}


def test_generate_body_carries_every_given_field() -> None:
    """Every argument given reaches the body under its official name."""
    request = build_generate(
        prompt="p",
        model="adapter",
        num_inference_steps=7,
        guidance_scale=2.5,
        seed=42,
        response_format="jpeg",
        control_images=[{"image": URL}],
        controlnet_weights=[0.25],
    )
    assert orjson.loads(dumps_request(request)) == {
        "prompt": "p",
        "model": "adapter",
        "num_inference_steps": 7,
        "guidance_scale": 2.5,
        "seed": 42,
        "response_format": "jpeg",
        "control_images": [{"image": URL}],
        "controlnet_weights": [0.25],
    }


def test_seed_zero_is_sent() -> None:
    """seed=0 is a real seed, not a missing one: it is on the wire."""
    assert orjson.loads(dumps_request(build_generate(prompt="p", seed=0)))["seed"] == 0


def test_integer_guidance_scale_is_written_as_a_float() -> None:
    """guidance_scale=3 is written as the JSON number 3.0, as the official SDK does."""
    raw = dumps_request(build_generate(prompt="p", guidance_scale=3))
    assert b'"guidance_scale":3.0' in raw
    assert isinstance(orjson.loads(raw)["guidance_scale"], float)


def test_integer_controlnet_weights_are_written_as_floats() -> None:
    """Weights given as ints are sent as floats."""
    request = build_generate(prompt="p", control_images=[URL, URL], controlnet_weights=[0, 1])
    assert b'"controlnet_weights":[0.0,1.0]' in dumps_request(request)


def test_single_edit_image_stays_an_object() -> None:
    """One edit image is sent as one {"image": ...} object, not a one-element list."""
    body = orjson.loads(dumps_request(build_edit(image={"image": URL}, prompt="p")))
    assert body["image"] == {"image": URL}


def test_edit_image_list_stays_a_list() -> None:
    """A list of edit images (even of one) is sent as a list."""
    body = orjson.loads(dumps_request(build_edit(image=[{"image": URL}], prompt="p")))
    assert body["image"] == [{"image": URL}]


def test_edit_image_tuple_is_sent_as_a_list() -> None:
    """A tuple of edit images is sent as a JSON list."""
    body = orjson.loads(dumps_request(build_edit(image=(URL, URL), prompt="p")))
    assert body["image"] == [{"image": URL}, {"image": URL}]


def test_edit_body_omits_none_fields() -> None:
    """A minimal edit call sends image, prompt and the spec defaults only."""
    body = orjson.loads(dumps_request(build_edit(image=URL, prompt="snow")))
    assert body == {
        "image": {"image": URL},
        "prompt": "snow",
        "num_inference_steps": 20,
        "guidance_scale": 0.0,
    }


async def test_body_on_the_wire_is_the_converter_output(
    capture_client: Any, capture_server: Any
) -> None:
    """The client sends exactly the converter's bytes, as application/json."""
    await capture_client.container.image.generate(prompt="p", seed=5, guidance_scale=1)
    (sent,) = capture_server.requests
    assert sent.body == dumps_request(build_generate(prompt="p", seed=5, guidance_scale=1))
    assert sent.headers["Content-Type"] == "application/json"


def test_request_models_are_frozen() -> None:
    """A validated request cannot be changed after the fact (and so skip validation)."""
    request = GenerateRequest(prompt="p")
    with pytest.raises(AttributeError):
        request.num_inference_steps = 0  # type: ignore[misc]


# -- validation ---------------------------------------------------------------------------

_PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
_PNG_URI = "data:image/png;base64," + base64.b64encode(_PNG_1PX).decode()

_GENERATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("prompt-none", {"prompt": None}, "prompt"),
    ("prompt-int", {"prompt": 3}, "prompt"),
    ("prompt-bytes-not-utf8", {"prompt": b"\xff\xfe"}, "prompt"),
    ("steps-0", {"num_inference_steps": 0}, "num_inference_steps"),
    ("steps-51", {"num_inference_steps": 51}, "num_inference_steps"),
    ("steps-float", {"num_inference_steps": 2.5}, "num_inference_steps"),
    ("steps-str", {"num_inference_steps": "three"}, "num_inference_steps"),
    ("steps-str-fraction", {"num_inference_steps": "2.5"}, "num_inference_steps"),
    ("guidance-nan", {"guidance_scale": math.nan}, "guidance_scale"),
    ("guidance-inf", {"guidance_scale": math.inf}, "guidance_scale"),
    ("guidance-neg-inf", {"guidance_scale": -math.inf}, "guidance_scale"),
    ("guidance-str", {"guidance_scale": "high"}, "guidance_scale"),
    ("guidance-str-nan", {"guidance_scale": "nan"}, "guidance_scale"),
    ("seed-float", {"seed": 3.5}, "seed"),
    ("seed-float-inf", {"seed": math.inf}, "seed"),
    ("format-png", {"response_format": "png"}, "response_format"),
    (
        "weight-above-1",
        {"control_images": [_PNG_URI], "controlnet_weights": [1.5]},
        "controlnet_weights[0]",
    ),
    (
        "weight-below-0",
        {"control_images": [_PNG_URI], "controlnet_weights": [-0.1]},
        "controlnet_weights[0]",
    ),
    (
        "weight-nan",
        {"control_images": [_PNG_URI], "controlnet_weights": [math.nan]},
        "controlnet_weights[0]",
    ),
    (
        "weights-too-many",
        {"control_images": [_PNG_URI], "controlnet_weights": [0.5, 0.5]},
        "controlnet_weights",
    ),
    (
        "weights-too-few",
        {"control_images": [_PNG_URI, _PNG_URI], "controlnet_weights": [0.5]},
        "controlnet_weights",
    ),
    ("weights-without-images", {"controlnet_weights": [0.5]}, "controlnet_weights"),
    ("control-images-not-a-list", {"control_images": _PNG_URI}, "control_images"),
]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [pytest.param(kwargs, field, id=name) for name, kwargs, field in _GENERATE_CASES],
)
async def test_generate_validation_fails_before_the_wire(
    capture_client: Any, capture_server: Any, kwargs: dict[str, Any], field: str
) -> None:
    """Each invalid generate argument raises FriendliValidationError naming it; nothing is sent."""
    call = {"prompt": "a cat", **kwargs}
    with pytest.raises(FriendliValidationError) as caught:
        await capture_client.container.image.generate(**call)
    assert caught.value.field == field
    assert field in str(caught.value)
    assert capture_server.requests == []
    encoded = _PNG_URI.split(",", 1)[1]
    for text in (str(caught.value), repr(caught.value), repr(caught.value.args)):
        assert encoded not in text


_EDIT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("image-none", {"image": None}, "image"),
    ("steps-51", {"num_inference_steps": 51}, "num_inference_steps"),
    ("guidance-nan", {"guidance_scale": math.nan}, "guidance_scale"),
    ("seed-float", {"seed": 2.5}, "seed"),
    ("format-webp", {"response_format": "webp"}, "response_format"),
]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [pytest.param(kwargs, field, id=name) for name, kwargs, field in _EDIT_CASES],
)
async def test_edit_validation_fails_before_the_wire(
    capture_client: Any, capture_server: Any, kwargs: dict[str, Any], field: str
) -> None:
    """Each invalid edit argument raises FriendliValidationError naming it; nothing is sent."""
    call = {"image": _PNG_URI, "prompt": "add snow", **kwargs}
    with pytest.raises(FriendliValidationError) as caught:
        await capture_client.container.image.edit(**call)
    assert caught.value.field == field
    assert capture_server.requests == []
    assert _PNG_URI.split(",", 1)[1] not in str(caught.value)


@pytest.mark.parametrize("method", ["generate", "edit"])
async def test_unknown_keyword_is_a_type_error(
    capture_client: Any, capture_server: Any, method: str
) -> None:
    """A misspelt keyword raises TypeError, as Python does, and sends nothing."""
    call = getattr(capture_client.container.image, method)
    kwargs: dict[str, Any] = {"prompt": "p", "num_steps": 5}
    if method == "edit":
        kwargs["image"] = _PNG_URI
    with pytest.raises(TypeError, match="num_steps"):
        await call(**kwargs)
    assert capture_server.requests == []


async def test_edit_without_image_is_a_type_error(capture_client: Any, capture_server: Any) -> None:
    """Leaving out the required image keyword raises TypeError and sends nothing."""
    with pytest.raises(TypeError, match="image"):
        await capture_client.container.image.edit(prompt="p")  # type: ignore[call-arg]
    assert capture_server.requests == []


async def test_positional_arguments_are_refused(capture_client: Any) -> None:
    """Arguments are keyword-only, like the official SDK's."""
    with pytest.raises(TypeError):
        await capture_client.container.image.generate("a cat")  # type: ignore[misc]


@pytest.mark.parametrize("seed", [0, 1, MAX_SEED])
def test_seed_range_bounds_are_accepted(seed: int) -> None:
    """Seeds from 0 to 2**32 - 1 inclusive are valid."""
    assert GenerateRequest(prompt="p", seed=seed).seed == seed


_ALLOWED_BY_THE_CONTRACT: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("prompt-empty", {"prompt": ""}, {"prompt": ""}),
    ("prompt-blank", {"prompt": " \n\t "}, {"prompt": " \n\t "}),
    ("model-empty", {"model": ""}, {"model": ""}),
    ("seed-negative", {"seed": -1}, {"seed": -1}),
    ("seed-beyond-32-bits", {"seed": 2**40}, {"seed": 2**40}),
    ("control-images-empty", {"control_images": []}, {"control_images": []}),
    (
        "control-images-and-weights-empty",
        {"control_images": [], "controlnet_weights": []},
        {"control_images": [], "controlnet_weights": []},
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "sent"),
    [pytest.param(kwargs, sent, id=name) for name, kwargs, sent in _ALLOWED_BY_THE_CONTRACT],
)
async def test_values_the_contract_allows_are_sent(
    capture_client: Any, capture_server: Any, kwargs: dict[str, Any], sent: dict[str, Any]
) -> None:
    """What the OpenAPI file allows reaches the wire as given: the server judges it."""
    await capture_client.container.image.generate(**{"prompt": "p", **kwargs})
    (request,) = capture_server.requests
    body = json.loads(request.body)
    assert {key: body[key] for key in sent} == sent


async def test_an_empty_edit_list_is_sent(capture_client: Any, capture_server: Any) -> None:
    """``edit(image=[])``: the schema sets no minimum, so the server says what it thinks."""
    await capture_client.container.image.edit(image=[], prompt="p")
    (request,) = capture_server.requests
    assert json.loads(request.body)["image"] == []


@pytest.mark.parametrize("steps", [1, 50])
def test_step_bounds_are_accepted(steps: int) -> None:
    """1 and 50 inference steps are the inclusive bounds."""
    assert EditRequest(image=ImageInput(URL), prompt="p", num_inference_steps=steps)


@pytest.mark.parametrize("weights", [[0], [1], [0.0], [1.0]])
def test_weight_bounds_are_accepted(weights: list[float]) -> None:
    """0 and 1 are valid ControlNet weights."""
    request = build_generate(prompt="p", control_images=[URL], controlnet_weights=weights)
    assert request.controlnet_weights == [float(weights[0])]


def test_image_input_refuses_an_empty_string() -> None:
    """ImageInput("") is refused: there is no image to send."""
    with pytest.raises(FriendliValidationError) as caught:
        ImageInput("")
    assert caught.value.field == "image"


def test_numpy_like_reals_are_accepted() -> None:
    """Real numbers that are not floats (Fraction, numpy scalars) are sent as JSON floats."""
    from fractions import Fraction

    from friendli_image._requests import GenerateRequest as build_generate
    from friendli_image._serde import dumps_request

    request = build_generate(
        prompt="x",
        guidance_scale=Fraction(7, 2),  # type: ignore[arg-type]
        control_images=["https://example.com/a.png"],
        controlnet_weights=[Fraction(1, 2)],  # type: ignore[list-item]
    )
    assert b'"guidance_scale":3.5' in dumps_request(request)
    assert b'"controlnet_weights":[0.5]' in dumps_request(request)


@pytest.mark.parametrize("weights", [5, 0.5, "0.5", None.__class__])
def test_non_list_controlnet_weights_are_a_validation_error(weights: object) -> None:
    """A scalar or string for controlnet_weights is a FriendliValidationError, not a TypeError."""
    from friendli_image._requests import GenerateRequest as build_generate

    with pytest.raises(FriendliValidationError) as caught:
        build_generate(
            prompt="x",
            control_images=["https://example.com/a.png"],
            controlnet_weights=weights,  # type: ignore[arg-type]
        )
    assert caught.value.field == "controlnet_weights"
