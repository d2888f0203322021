"""Scenarios 35-37: redirects, secrets on every surface, proxies, .netrc and TLS.

Redirects: the SDK never follows them (following is not offered). A 3xx raises
``FriendliAPIStatusError`` with ``location``; nothing is sent to the target, so the
token cannot reach another origin and a POST is never turned into a GET. No fake resolver
is needed: with nothing followed, no name in a Location header is ever resolved.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import shutil
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from friendli_image import (
    AsyncFriendli,
    FriendliAPIStatusError,
    FriendliAuthenticationError,
    FriendliConnectionError,
    FriendliValidationError,
    RetryConfig,
    Timeout,
)
from friendli_image._cli import main
from friendli_image.server import LocalServer, ServerConfig, create_app

from .harness import (
    TINY_PNG,
    TOKEN,
    Figures,
    RawHandler,
    RawServer,
    SecretProbe,
    gen,
    http_response,
    image_body,
    read_request,
)

MakeClient = Callable[..., AsyncFriendli]
StartRaw = Callable[[RawHandler], Awaitable[RawServer]]


async def _capture(raw_server: StartRaw) -> tuple[RawServer, list[bytes]]:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            seen.append(request)
            writer.write(http_response(image_body()))
            await writer.drain()

    return await raw_server(handler), seen


@pytest.mark.scenario(35)
@pytest.mark.parametrize("status", ["302 Found", "307 Temporary Redirect"])
async def test_redirects_to_another_origin_never_carry_the_token(
    raw_server: StartRaw, make_client: MakeClient, figures: Figures, status: str
) -> None:
    """302/307 to another port are followed as httpx follows them (307 resends the POST,
    302 becomes a GET), and the other origin never sees the token."""
    b, seen = await _capture(raw_server)
    location = f"{b.url}/v1/images/generations"

    async def redirector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(http_response(b"", status=status, extra=f"Location: {location}\r\n"))
            await writer.drain()

    a = await raw_server(redirector)
    figures.add("inject.status")
    result = await gen(make_client(a.url))
    assert result.data == TINY_PNG
    (request,) = seen
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST " if status.startswith("307") else b"GET ")
    assert (b"prompt" in body) is status.startswith("307")
    assert b"authorization" not in head.lower()
    assert TOKEN.encode() not in request
    figures.add("fail.typed")


@pytest.mark.scenario(35)
async def test_a_redirect_loop_stops_with_the_location(
    raw_server: StartRaw, make_client: MakeClient, secrets: SecretProbe
) -> None:
    """More than 20 redirects raise FriendliAPIStatusError with the last Location."""
    hops: list[bytes] = []

    async def looper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            hops.append(request)
            location = f"/v1/images/generations?hop={len(hops)}"
            writer.write(
                http_response(
                    b"", status="307 Temporary Redirect", extra=f"Location: {location}\r\n"
                )
            )
            await writer.drain()

    a = await raw_server(looper)
    with pytest.raises(FriendliAPIStatusError) as caught:
        await gen(make_client(a.url))
    assert caught.value.status == 307
    assert caught.value.location == "/v1/images/generations?hop=21"
    assert len(hops) == 21
    assert all(f"bearer {TOKEN}".lower().encode() in hop.lower() for hop in hops)  # same origin
    secrets.check(caught.value)


@pytest.fixture
async def auth_server() -> AsyncIterator[LocalServer]:
    """A server that requires a token other than the probe's."""
    config = ServerConfig(static_image=TINY_PNG, token="sk-the-right-one")
    async with LocalServer(config) as srv:
        yield srv


@pytest.mark.scenario(36)
async def test_token_is_absent_from_every_surface(
    auth_server: LocalServer, server: LocalServer, make_client: MakeClient, secrets: SecretProbe
) -> None:
    """The token shows in no repr/str/args/pickle/traceback/cause/log of client, result, error."""
    wrong = make_client(auth_server.url)
    with pytest.raises(FriendliAuthenticationError) as caught:
        await gen(wrong)
    restored = pickle.loads(pickle.dumps(caught.value))  # noqa: S301  (our own object)
    assert restored.status == 401
    client = make_client(server.url)
    result = await gen(client)
    secrets.check(caught.value, restored, result, client, RetryConfig(), Timeout())
    with pytest.raises(TypeError):
        pickle.dumps(client)
    # The token really was sent (so the probe is meaningful).
    assert server.records[-1].credentials["Authorization"].reveal() == f"Bearer {TOKEN}"


@pytest.mark.scenario(36)
async def test_debug_log_has_one_line_per_attempt_without_the_token(
    server: LocalServer,
    make_client: MakeClient,
    tid: str,
    caplog: pytest.LogCaptureFixture,
    figures: Figures,
) -> None:
    """DEBUG logs each attempt (path, status, attempt, request id), INFO each retry."""
    from friendli_image.server import Action

    server.script(tid, [Action.status(503)])
    client = make_client(server.url)
    with caplog.at_level(logging.DEBUG, logger="friendli_image"):
        result = await gen(client)
    ours = [r for r in caplog.records if r.name == "friendli_image"]
    attempts = [r for r in ours if r.levelno == logging.DEBUG and "attempt=" in r.getMessage()]
    retries = [r for r in ours if r.levelno == logging.INFO]
    assert len(attempts) == 2
    assert "-> 503 attempt=1" in attempts[0].getMessage()
    assert "-> 200 attempt=2" in attempts[1].getMessage()
    assert all(result.request_id in r.getMessage() for r in attempts + retries)
    assert len(retries) == 1
    for record in caplog.records:
        figures.add("secret.log_records")
        assert TOKEN not in record.getMessage()


@pytest.mark.scenario(37)
async def test_proxy_environment_is_honoured_as_httpx_does(
    server: LocalServer,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    unused_tcp_port: int,
) -> None:
    """HTTP(S)_PROXY/ALL_PROXY at a dead port: used by default (as the official SDK's
    httpx does) and with trust_env=True; ignored with trust_env=False."""
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    for name in ("no_proxy", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    assert (await gen(make_client(server.url, trust_env=False))).attempts == 1
    for trust_env in (None, True):
        proxied = make_client(server.url, trust_env=trust_env, retries=RetryConfig.disabled())
        with pytest.raises(FriendliConnectionError):
            await gen(proxied)
    assert server.stats.total_requests == 1


@pytest.mark.scenario(37)
async def test_netrc_is_ignored_unless_trusted(
    raw_server: StartRaw,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A .netrc login for 127.0.0.1 is sent only with trust_env=True and no token (never
    by default, where the proxy variables are read)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password pass\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    raw, seen = await _capture(raw_server)
    await gen(make_client(raw.url, token=""))
    await gen(make_client(raw.url, token="", trust_env=True))
    await gen(make_client(raw.url, trust_env=True))
    heads = [request.split(b"\r\n\r\n")[0].lower() for request in seen]
    assert b"authorization" not in heads[0]
    assert b"authorization: basic dxnlcjpwyxnz" in heads[1]
    assert f"authorization: bearer {TOKEN}".lower().encode() in heads[2]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_url(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """The bundled app served over HTTPS with the self-signed certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.AppRunner(create_app(ServerConfig(static_image=TINY_PNG)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.scenario(37)
async def test_self_signed_tls_fails_by_default_and_works_with_its_ca(
    tls_url: str,
    certificate: tuple[Path, Path],
    make_client: MakeClient,
    figures: Figures,
    secrets: SecretProbe,
) -> None:
    """Verification is on: a self-signed cert fails once (not retried); its CA bundle works."""
    with pytest.raises(FriendliConnectionError, match="TLS") as caught:
        await gen(make_client(tls_url))
    assert caught.value.attempts == 1
    figures.add("fail.expected")
    figures.add("fail.typed")
    secrets.check(caught.value)
    assert (await gen(make_client(tls_url, verify=certificate[0]))).data == TINY_PNG
    context = ssl.create_default_context(cafile=str(certificate[0]))
    assert (await gen(make_client(tls_url, verify=context))).data == TINY_PNG


@pytest.mark.scenario(37)
async def test_verify_false_warns_once_and_connects(tls_url: str, make_client: MakeClient) -> None:
    """verify=False warns once at construction, then every call goes through unverified."""
    with pytest.warns(UserWarning, match="verify=False") as caught:
        client = make_client(tls_url, verify=False)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await gen(client)
        await gen(client)


@pytest.mark.scenario(37)
def test_unusable_verify_values_are_validation_errors(tmp_path: Path) -> None:
    """A missing CA bundle or a wrong type for verify fails at construction."""
    with pytest.raises(FriendliValidationError, match="verify"):
        AsyncFriendli(verify=tmp_path / "missing.pem")
    with pytest.raises(FriendliValidationError, match="verify"):
        AsyncFriendli(verify=1)  # type: ignore[arg-type]


@pytest.mark.scenario(37)
async def test_token_over_plain_http_to_a_remote_host_warns_once(
    make_client: MakeClient, server: LocalServer
) -> None:
    """A token over http:// to a non-loopback host warns once; loopback and no token do not."""
    remote = make_client(
        "http://192.0.2.1:9",  # TEST-NET-1: never answers
        retries=RetryConfig.disabled(),
        timeout=Timeout(connect=0.2),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(FriendliConnectionError):
                await gen(remote)
    assert [str(w.message)[:35] for w in caught] == ["the API token is sent in clear text"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await gen(make_client(server.url))
        quiet = make_client("http://192.0.2.1:9", token="", retries=0, timeout=Timeout(connect=0.2))
        with pytest.raises(FriendliConnectionError):
            await gen(quiet)


_CREDENTIAL_URLS = [
    "http://user:pw-s3cret@127.0.0.1:{port}",
    "http://pw-s3cret@127.0.0.1:{port}",
    "https://user:pw-s3cret@127.0.0.1:{port}/v1",
    "http://user:pw-s3cret@[::1]:{port}",
]


@pytest.mark.scenario(43)
@pytest.mark.scenario(37)
@pytest.mark.parametrize("template", _CREDENTIAL_URLS)
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
async def test_credentials_in_server_url_are_refused_without_echo(  # noqa: PLR0917
    raw_server: StartRaw,
    figures: Figures,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    template: str,
    with_token: bool,
) -> None:
    """user:pw@ in server_url: FriendliValidationError naming token=, the password nowhere,
    nothing sent (no Basic auth behind the user's back); the CLI exits 2 in one line."""
    raw, seen = await _capture(raw_server)
    url = template.format(port=raw.port)
    token = TOKEN if with_token else None
    figures.add("bad_input.tried")
    with pytest.raises(FriendliValidationError, match="token=") as caught:
        AsyncFriendli(token=token, server_url=url)
    assert "pw-s3cret" not in f"{caught.value} {caught.value!r} {caught.value.args}"
    client = AsyncFriendli(token=token, server_url=raw.url)
    try:
        with pytest.raises(FriendliValidationError, match="token="):
            await client.container.image.generate(prompt="p", server_url=url)
    finally:
        await client.close()
    monkeypatch.setenv("FRIENDLI_SERVER_URL", url)
    with pytest.raises(FriendliValidationError, match="token="):
        AsyncFriendli(token=token)
    code = await asyncio.to_thread(main, ["generate", "p", "-o", "/dev/null", "--server-url", url])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "pw-s3cret" not in err
    assert seen == []
    assert raw.connections == 0
    figures.add("bad_input.rejected")


_BAD_HEADERS: list[tuple[dict[str, str], str]] = [
    ({"Content-Length": "5"}, "truncates or pads"),
    ({"content-length": "999999"}, "truncates or pads"),
    ({"Transfer-Encoding": "chunked"}, "smuggling"),
    ({"Host": "evil.example"}, "server_url"),
    ({"Connection": "close"}, "connection management"),
    ({"Keep-Alive": "timeout=5"}, "connection management"),
    ({"TE": "trailers"}, "hop-by-hop"),
    ({"Upgrade": "h2c"}, "upgrade"),
    ({"Trailer": "X-Sig"}, "trailers"),
    ({"X Bad": "v"}, "not a valid HTTP header name"),
    ({"X:Bad": "v"}, "not a valid HTTP header name"),
    ({"": "v"}, "is empty"),
    ({"X-Ünïcode": "v"}, "not a valid HTTP header name"),
    ({"X-Key": "caf\u00e9"}, "non-ASCII"),
    ({"X-Key": "a\r\nX-Injected: 1"}, "line break"),
    ({"X-Key": "nul\x00"}, "control character"),
    ({"X-Key": "a", "x-key": "b"}, "twice"),
]


@pytest.mark.scenario(45)
@pytest.mark.scenario(25)
@pytest.mark.parametrize(("headers", "reason"), _BAD_HEADERS, ids=lambda v: repr(v)[:28])
async def test_headers_that_corrupt_the_request_are_refused(
    raw_server: StartRaw,
    make_client: MakeClient,
    figures: Figures,
    headers: dict[str, str],
    reason: str,
) -> None:
    """Framing, hop-by-hop and malformed headers: refused at the client and at the call,
    saying why, naming the header and never its value; nothing reaches the wire."""
    raw, seen = await _capture(raw_server)
    figures.add("headers.tried")
    with pytest.raises(FriendliValidationError, match=reason) as caught:
        make_client(raw.url, http_headers=headers)
    assert caught.value.field == "http_headers"
    client = make_client(raw.url)
    with pytest.raises(FriendliValidationError, match=reason):
        await gen(client, http_headers=headers)
    for value in headers.values():
        if len(value) > 3:
            assert value not in str(caught.value)
    assert seen == []
    assert raw.connections == 0
    figures.add("headers.refused")
    shown = ", ".join(f"{name or '(empty name)'}: {value!r}" for name, value in headers.items())
    figures.record_refusal(shown, str(caught.value).removeprefix("invalid http_headers: "))


@pytest.mark.scenario(36)
async def test_a_user_authorization_header_replaces_the_token_and_is_redacted(
    raw_server: StartRaw, make_client: MakeClient, secrets: SecretProbe
) -> None:
    """http_headers={"Authorization": ...} is sent instead of "Bearer <token>" (for a
    gateway with another scheme), per call too, and kept and redacted like the token."""
    custom = f"Basic {TOKEN}"
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            requests.append(request)
            writer.write(http_response(b'{"detail": "echo ' + custom.encode() + b'"}', "400 Bad"))
            await writer.drain()

    raw = await raw_server(handler)
    client = make_client(raw.url, token=None, http_headers={"authorization": custom})
    with pytest.raises(FriendliAPIStatusError) as caught:
        await gen(client)
    assert f"\r\nAuthorization: {custom}\r\n".encode() in requests[-1]
    assert b"Bearer" not in requests[-1]
    secrets.check(caught.value, client)
    per_call = make_client(raw.url)
    with pytest.raises(FriendliAPIStatusError) as caught:
        await gen(per_call, http_headers={"Authorization": custom})
    assert f"\r\nAuthorization: {custom}\r\n".encode() in requests[-1]
    secrets.check(caught.value)
