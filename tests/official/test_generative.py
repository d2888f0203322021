"""The official SDK as an oracle over generated calls (hypothesis).

Each example draws a call the way ported code makes one: the arguments from the value
space the official pydantic models accept (numbers as text, whole floats, bytes, mappings,
models, tuples and generators, values the contract allows and values it forbids), the
per-call options (``server_url`` with and without a trailing slash or a path prefix,
``retries``, user headers, including ones the SDKs set themselves), client settings and
environment variables (the token from ``FRIENDLI_TOKEN``, ``x_friendli_team``), and what
the server does (statuses with bodies of every shape, a 200 that is not the API, a bad
image, redirects, slow answers). The call runs through the official SDK and through
friendli_image against the bundled server, which records every request. Compared:

- the wire: method, path, the headers that matter (``Authorization``, ``Content-Type``,
  ``Accept``, the user's), and the JSON body of every request;
- the outcome: the image, or the error as the official classes catch it (every official
  class that catches the official error catches ours), with its status code and body.

A mismatch is excused only by a key of ``friendli_image._compat.DIFFERENCES``, chosen by
`_excuse` from what the example drew; anything else fails with both sides shown.

``FRIENDLI_GENERATIVE=long`` runs the long profile (by hand: 2,000 examples, random
seed); CI runs the fixed-seed ``ci`` profile (``nox -s official``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

pytest.importorskip("friendli", reason="the generative harness needs friendli==0.16.3")
pytest.importorskip("hypothesis")

import friendli
import friendli.models as official_models
import friendli.utils as official_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import friendli_image
from friendli_image import models as our_models
from friendli_image import utils as our_utils
from friendli_image._compat import DIFFERENCES
from friendli_image.server import Action, LocalServer, ServerConfig

settings.register_profile(
    "ci",
    max_examples=500,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
PROFILE = "long" if os.environ.get("FRIENDLI_GENERATIVE") == "long" else "ci"
TOKEN = "generative-token"
DECLARED = {difference.key for difference in DIFFERENCES}


def _png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG = _png((200, 30, 30))
PNG_URI = "data:image/png;base64," + PNG


# -- what an example draws -----------------------------------------------------------------


@attrs.frozen
class Image:
    """One image input, built per SDK: ``{"image": ...}`` or that SDK's ``ImageInput``."""

    form: str  # "dict", "dict-bytes", "model"
    text: str

    def build(self, models: Any) -> Any:
        if self.form == "model":
            return models.ImageInput(image=self.text)
        if self.form == "dict-bytes":
            return {"image": self.text.encode()}
        return {"image": self.text}


@attrs.frozen
class Sequence:
    """A list argument as ported code passes it: a list, a tuple or a generator."""

    kind: str
    items: tuple[Any, ...]

    def build(self, models: Any) -> Any:
        built = [item.build(models) if isinstance(item, Image) else item for item in self.items]
        if self.kind == "tuple":
            return tuple(built)
        if self.kind == "generator":
            return (item for item in built)
        return built


@attrs.frozen
class Case:
    """One drawn example."""

    operation: str
    arguments: dict[str, Any]
    url_suffix: str
    retries: str  # "unset", "none", "fast"
    headers: dict[str, str]
    token_from_env: bool
    team: str | None
    script: tuple[Action, ...]


_IMAGE_TEXT = st.sampled_from([PNG_URI, PNG])
images = st.builds(Image, st.sampled_from(["dict", "dict-bytes", "model"]), _IMAGE_TEXT)


def sequences(items: st.SearchStrategy[Any], max_size: int = 3) -> st.SearchStrategy[Sequence]:
    return st.builds(
        Sequence,
        st.sampled_from(["list", "tuple", "generator"]),
        st.lists(items, max_size=max_size).map(tuple),
    )


def integers_as_ported_code_has_them(low: int, high: int) -> st.SearchStrategy[Any]:
    """An integer, or what a CSV cell, a JSON config or NumPy make of one."""
    number = st.integers(low, high)
    return st.one_of(
        number,
        number.map(float),
        number.map(str),
        st.sampled_from([2.5, "2.5", "seven", True]),
    )


def reals_as_ported_code_has_them(low: float, high: float) -> st.SearchStrategy[Any]:
    number = st.floats(low, high, allow_nan=False, width=32)
    return st.one_of(number, number.map(str), st.integers(int(low), int(high)))


_PROMPTS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "   ", "a red kite", "ünïcode ✓"]),
    st.just(b"bytes prompt"),
)
_OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.none(), st.sampled_from(["", "(adapter-route)"])),
    "num_inference_steps": st.one_of(st.none(), integers_as_ported_code_has_them(-2, 55)),
    "guidance_scale": st.one_of(st.none(), reals_as_ported_code_has_them(-2.0, 12.0)),
    "seed": st.one_of(st.none(), integers_as_ported_code_has_them(-5, 2**40)),
    "response_format": st.one_of(st.none(), st.sampled_from(["raw", "jpeg", "png"])),
}
_GENERATE_ONLY: dict[str, st.SearchStrategy[Any]] = {
    "control_images": st.one_of(st.none(), sequences(images, 2)),
    "controlnet_weights": st.one_of(
        st.none(), sequences(reals_as_ported_code_has_them(-0.5, 1.5), 3)
    ),
}
_EDIT_IMAGE = st.one_of(images, sequences(images, 2))


@st.composite
def arguments(draw: st.DrawFn, operation: str) -> dict[str, Any]:
    drawn: dict[str, Any] = {"prompt": draw(_PROMPTS)}
    optional = dict(_OPTIONAL)
    if operation == "generate":
        optional.update(_GENERATE_ONLY)
    else:
        drawn["image"] = draw(_EDIT_IMAGE)
    for name in draw(st.sets(st.sampled_from(sorted(optional)), max_size=4)):
        drawn[name] = draw(optional[name])
    return drawn


_ERROR_BODIES = st.sampled_from(
    [
        None,
        {"detail": "busy"},
        {"error": {"message": "nope"}},
        "plain text",
        "<html>bad gateway</html>",
        b"",
    ]
)
actions = st.one_of(
    st.builds(
        Action.status,
        st.sampled_from([400, 401, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504]),
        st.just(None),
        _ERROR_BODIES,
        st.sampled_from(["application/json", "text/plain", "text/html"]),
    ),
    st.just(Action.status(200, body=b"<html>welcome</html>", content_type="text/html")),
    st.just(Action.status(200, body=b'{"images": []}')),
    st.just(Action.malformed_json()),
    st.just(Action.invalid_base64()),
    st.sampled_from([301, 302, 303, 307, 308]).map(
        lambda code: Action.status(code, {"Location": "/v1/images/generations"}, b"")
    ),
    st.just(Action.status(429, {"Retry-After": "0"})),
    st.floats(0.0, 0.15).map(Action.delay),
    st.just(Action.trickle(chunk_size=64, interval_s=0.01, total_chunks=4)),
    st.sampled_from([Action.drop_before_read(), Action.truncate()]),
)
_HEADERS = st.dictionaries(
    st.sampled_from(
        ["X-Custom", "User-Agent", "Accept", "X-Friendli-Team", "x-lower", "Authorization"]
    ),
    # Realistic values: ours removes a credential (an Authorization value) from every
    # text a server sends back, so a credential such as "value" would blank out words.
    st.sampled_from(["custom-value-1", "Bearer other-token-5678", "application/json"]),
    max_size=2,
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    operation = draw(st.sampled_from(["generate", "edit"]))
    script = tuple(draw(st.lists(actions, max_size=2)))
    # The official default backoff sleeps 0.5 s and more; a scripted failure is retried
    # with a fast policy (or not at all) to keep the budget.
    retries = draw(st.sampled_from(["none", "fast"] if script else ["unset", "none", "fast"]))
    return Case(
        operation=operation,
        arguments=draw(arguments(operation)),
        url_suffix=draw(st.sampled_from(["", "/", "/prefix", "/prefix/"])),
        retries=retries,
        headers=draw(_HEADERS),
        token_from_env=draw(st.booleans()),
        team=draw(st.sampled_from([None, "team-a"])),
        script=script,
    )


# -- running one side ----------------------------------------------------------------------


@attrs.frozen
class Side:
    """What one SDK did with a case: the requests the server saw, and the outcome."""

    wire: list[tuple[str, str, dict[str, str], Any]]
    outcome: tuple[Any, ...]
    caught_by: frozenset[str]


_COMPARED_HEADERS = frozenset({"authorization", "content-type", "accept", "x-friendli-team"})
_CATCHERS = ("SDKError", "FriendliCoreError", "ResponseValidationError", "NoResponseError")


@attrs.define
class Sdk:
    name: str
    module: Any
    models: Any
    utils: Any
    clients: dict[tuple[Any, ...], Any] = attrs.field(factory=dict)

    def client(self, case: Case) -> Any:
        key = (case.token_from_env, case.team)
        found = self.clients.get(key)
        if found is None:
            kwargs: dict[str, Any] = {} if case.token_from_env else {"token": TOKEN}
            if case.team is not None:
                kwargs["x_friendli_team"] = case.team
            found = self.clients[key] = self.module.SyncFriendli(**kwargs)
        return found

    def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                client.__exit__(None, None, None)

    def retries(self, case: Case) -> dict[str, Any]:
        if case.retries == "unset":
            return {}
        if case.retries == "none":
            return {"retries": None}
        strategy = self.utils.BackoffStrategy(1, 5, 1.5, 3000, jitter_ms=0)
        return {"retries": self.utils.RetryConfig("backoff", strategy, False)}

    def run(self, case: Case, server: LocalServer, test_id: str) -> Side:
        server.script(test_id, case.script)
        built = {
            name: value.build(self.models) if isinstance(value, Image | Sequence) else value
            for name, value in case.arguments.items()
        }
        call = getattr(self.client(case).container.image, case.operation)
        outcome: tuple[Any, ...]
        caught: frozenset[str] = frozenset()
        try:
            result = call(
                **built,
                server_url=server.url + case.url_suffix,
                http_headers={**case.headers, "x-test-id": test_id},
                **self.retries(case),
            )
            outcome = ("ok", bytes(result.image))
        except Exception as error:
            caught = frozenset(
                name for name in _CATCHERS if isinstance(error, getattr(self.models, name))
            )
            outcome = (
                _kind(error, self.name),
                getattr(error, "status_code", None),
                getattr(error, "body", None),
            )
        records = [
            record
            for record in server.records
            if {name.lower(): value for name, value in record.headers.items()}.get("x-test-id")
            == test_id
        ]
        wire = [
            (
                record.method,
                record.path,
                {
                    name.lower(): value
                    for name, value in record.headers.items()
                    if name.lower() in _COMPARED_HEADERS | {h.lower() for h in case.headers}
                },
                record.body,
            )
            for record in records
        ]
        return Side(wire, outcome, caught)


def _kind(error: BaseException, sdk: str) -> str:
    """What kind of failure, in terms both SDKs share."""
    if isinstance(error, official_models.FriendliCoreError | our_models.FriendliCoreError):
        return "status"
    if isinstance(error, ConnectionError) or type(error).__module__.startswith("httpx"):
        return "connection"
    name = type(error).__name__
    if (sdk == "official" and name == "ValidationError") or isinstance(
        error, friendli_image.FriendliValidationError
    ):
        return "invalid-argument"  # pydantic's ValidationError there, ours here
    return f"other:{name}"


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- comparing -----------------------------------------------------------------------------


def _details(outcome: tuple[Any, ...]) -> list[Any]:
    body = outcome[2] if len(outcome) > 2 else None
    try:
        return list(json.loads(str(body))["detail"])
    except (ValueError, KeyError, TypeError):
        return []


Request = tuple[str, str, dict[str, str], Any]


def _without_nulls(request: Request) -> Request:
    method, path, headers, body = request
    if isinstance(body, dict):
        body = {key: value for key, value in body.items() if value is not None}
    return method, path, headers, body


def _without_team(request: Request) -> Request:
    method, path, headers, body = request
    return method, path, {k: v for k, v in headers.items() if k != "x-friendli-team"}, body


def normalized(case: Case, official: Side, ours: Side) -> tuple[Side, Side, set[str]]:
    """Both sides with the declared wire-level differences taken out, and their keys."""
    keys = set()
    if case.team is not None and "x-friendli-team" not in {h.lower() for h in case.headers}:
        wire = [_without_team(request) for request in ours.wire]
        if wire != ours.wire:
            keys.add("team-header")
            ours = attrs.evolve(ours, wire=wire)
    official_wire = [_without_nulls(request) for request in official.wire]
    if official_wire != official.wire:
        keys.add("null-fields")
        official = attrs.evolve(official, wire=official_wire)
    return official, ours, keys


def _excuse(case: Case, official: Side, ours: Side) -> str | None:
    """The declared difference that accounts for a mismatch, or None."""
    if any(name.lower() == "user-agent" for name in case.headers):
        return "user-agent"
    mine = _details(ours.outcome)
    theirs = _details(official.outcome)
    if not ours.wire and ours.outcome[:2] == ("status", 422) and len(mine) == 1:
        if official.outcome == ours.outcome:
            return "refused-before-sending"
        judged = case.url_suffix in ("", "/") and (
            not case.script or case.script[0].kind in ("delay", "ok")
        )
        if not judged:
            # The server answered before it validated (a scripted answer, a path prefix
            # it does not serve); it refuses the same value when it validates.
            return "refused-before-sending"
        if len(theirs) > 1 and mine[0] in theirs:
            return "first-refusal"
    if (
        any(action.kind in ("drop_before_read", "truncate") for action in case.script)
        and official.outcome[0] == "connection"
        and len(ours.wire) > len(official.wire)
        and ours.wire[: len(official.wire)] == official.wire
    ):
        return "stale-reconnect"
    if (
        any(action.kind == "truncate" for action in case.script)
        and official.outcome[0] == "connection"
        and ours.outcome[0] == "status"
    ):
        return "truncated-error-body"
    statuses = {action.status_code for action in case.script if action.kind == "status"}
    if 500 in statuses and case.retries != "none":
        return "retry-500"
    if any(action.kind == "invalid_base64" for action in case.script) and (
        official.outcome[0] == "ok" and "ResponseValidationError" in ours.caught_by
    ):
        return "decoded-result"
    return None


findings: list[str] = []
excused: dict[str, int] = {}


def _same(official: Side, ours: Side) -> bool:
    return (
        official.wire == ours.wire
        and official.outcome == ours.outcome
        and official.caught_by <= ours.caught_by
    )


def compare(case: Case, official: Side, ours: Side) -> None:
    """Fail unless both SDKs did the same, or a declared difference explains it."""
    if _same(official, ours):
        return
    official, ours, keys = normalized(case, official, ours)
    key = None if _same(official, ours) else _excuse(case, official, ours)
    if key is not None:
        keys.add(key)
    if key is not None or (keys and _same(official, ours)):
        for each in keys:
            assert each in DECLARED
            excused[each] = excused.get(each, 0) + 1
        return
    report = (
        f"{case}\n official wire: {official.wire}\n ours wire:     {ours.wire}\n"
        f" official: {official.outcome} caught by {sorted(official.caught_by)}\n"
        f" ours:     {ours.outcome} caught by {sorted(ours.caught_by)}"
    )
    findings.append(report)
    raise AssertionError(report)


# -- the test ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    static = base64.b64decode(PNG)
    with LocalServer(ServerConfig(static_image=static, max_records=100_000)) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdks() -> Iterator[tuple[Sdk, Sdk]]:
    official = Sdk("official", friendli, official_models, official_utils)
    ours = Sdk("ours", friendli_image, our_models, our_utils)
    yield official, ours
    official.close()
    ours.close()
    # The numbers a run reports (shown by pytest -s, and in the CI log).
    print(
        f"\ngenerative harness ({PROFILE}): {_stats['examples']} examples in "
        f"{_stats['seconds']:.1f} s; excused by declared differences: {excused or 'none'}"
    )


_ids = itertools.count()
_stats = {"examples": 0, "seconds": 0.0}


@pytest.mark.subprocess
@settings(settings.get_profile(PROFILE))
@given(case=cases())
def test_both_sdks_do_the_same(
    case: Case, server: LocalServer, sdks: tuple[Sdk, Sdk], record_property: Callable[..., None]
) -> None:
    """Every drawn call reaches the wire and ends the same way through both SDKs."""
    started = time.perf_counter()
    number = next(_ids)

    environment = {"NO_PROXY": "*", **({"FRIENDLI_TOKEN": TOKEN} if case.token_from_env else {})}
    with _environment(environment):
        sides = [sdk.run(case, server, f"{sdk.name}-{number}") for sdk in sdks]
    _stats["examples"] += 1
    _stats["seconds"] += time.perf_counter() - started
    record_property("examples", _stats["examples"])
    compare(case, *sides)
