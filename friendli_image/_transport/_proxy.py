"""Routing an attempt: the proxy and ``.netrc`` credentials from the environment, and redirects.

Which credentials a request carries, and which follow a redirect (same origin only, as
httpx does), is decided here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import netrc
import os
import urllib.request
from typing import Final

import aiohttp
import pybase64
from yarl import URL

from friendli_image._secrets import Secret

__all__ = [
    "MAX_REDIRECTS",
    "NO_ROUTE",
    "EnvRoute",
    "bearer",
    "is_loopback",
    "keeps_credentials",
    "redirect_target",
]

#: Redirects followed within one attempt, as httpx follows them (and as many).
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS: Final = 20


def redirect_target(response: aiohttp.ClientResponse, hop: int) -> URL | None:
    """Where a redirect sends the request, or None when it is not followed."""
    location = response.headers.get("Location")
    if response.status not in _REDIRECT_STATUSES or not location or hop >= MAX_REDIRECTS:
        return None
    try:
        target = response.url.join(URL(location))
    except ValueError:
        return None
    return target if target.scheme in ("http", "https") and target.host else None


def keeps_credentials(origin: URL, target: URL) -> bool:
    """httpx's rule: ``Authorization`` goes along to the same origin, or to its https."""
    if (origin.scheme, origin.host, origin.port) == (target.scheme, target.host, target.port):
        return True
    return (
        origin.host == target.host
        and origin.scheme == "http"
        and origin.port == 80
        and target.scheme == "https"
        and target.port == 443
    )


def bearer(token: Secret) -> str:
    return f"Bearer {token.reveal()}"


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _basic(login: str, password: str) -> str:
    return "Basic " + pybase64.b64encode(f"{login}:{password}".encode()).decode("ascii")


class EnvRoute:
    """Where the environment sends requests for one host: proxy, proxy login, ``.netrc`` login.

    The logins are kept as `Secret`: a route is cached on the client between calls.
    """

    __slots__ = ("authorization", "proxy", "proxy_authorization")

    def __init__(
        self,
        proxy: URL | None = None,
        proxy_authorization: Secret | None = None,
        authorization: Secret | None = None,
    ) -> None:
        self.proxy = proxy
        self.proxy_authorization = proxy_authorization
        self.authorization = authorization

    @classmethod
    def from_env(cls, url: URL, use_netrc: bool) -> EnvRoute:
        host = url.host or ""
        proxy = proxy_authorization = authorization = None
        if not urllib.request.proxy_bypass(host):
            proxies = urllib.request.getproxies()
            found = proxies.get(url.scheme) or proxies.get("all")
            if found:
                proxy = URL(found if "://" in found else f"http://{found}")
                if proxy.user is not None:
                    proxy_authorization = Secret(_basic(proxy.user, proxy.password or ""))
                    proxy = proxy.with_user(None)
        if use_netrc:
            with contextlib.suppress(OSError, netrc.NetrcParseError):
                entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
                if entry is not None:
                    authorization = Secret(_basic(entry[0] or "", entry[2] or ""))
        return cls(proxy, proxy_authorization, authorization)


NO_ROUTE: Final = EnvRoute()
