"""Credentials: how they are held (`Secret`), checked, split from headers, and redacted.

A credential lives in a `Secret` from the moment a user hands it over, so no repr, str or
pickle of ours shows it; `Redactor` removes it from everything a server sent back.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Final

from multidict import CIMultiDict

from ._exceptions import EXCERPT_CHARS, FriendliValidationError, excerpt

__all__ = [
    "AUTHORIZATION",
    "Redactor",
    "Secret",
    "check_token",
    "hide_credentials",
    "split_authorization",
    "token_source",
]

#: What HTTP forbids in header names and values (RFC 9110 5.5): aiohttp raises a bare
#: ValueError for them at send time, so they are refused up front.
_FORBIDDEN_HEADER_CHARS: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Secret:
    """Holds a credential (the token, a user's ``Authorization`` value) so that no repr,
    str or pickle of ours can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The credential itself, for the ``Authorization`` header (and redaction) only."""
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __reduce__(self) -> Any:
        raise TypeError("the token is not picklable")


def token_source(value: Callable[[], str | None]) -> Callable[[], Secret | None]:
    """Wrap a callable token: each call's token is checked as a static one is."""

    def current() -> Secret | None:
        return check_token(value())

    return current


def check_token(value: str | Secret | None) -> Secret | None:
    """Wrap the token (None or "" for none), or raise if it cannot go into a header.

    A `Secret` is taken as the token it holds (a `ClientSpec` hands the token on so).
    """
    if isinstance(value, Secret):
        value = value.reveal()
    if value is not None and not isinstance(value, str):
        raise FriendliValidationError("token", f"must be a str or None, got {type(value)}")
    if not value:
        return None
    if _FORBIDDEN_HEADER_CHARS.search(value):
        # Typically a trailing newline from a file; the token itself is not shown.
        raise FriendliValidationError(
            "token",
            "contains a line break or control character (often a trailing newline read "
            "from a file); pass token.strip()",
        )
    return Secret(value)


#: The header a user-supplied ``Authorization`` goes under (see `split_authorization`).
AUTHORIZATION: Final = "Authorization"


def hide_credentials(headers: Mapping[str, str | Secret]) -> dict[str, str | Secret]:
    """A copy of ``headers`` with the ``Authorization`` value held as a `Secret`.

    What keeps headers a user gave (`CallOverrides`, a batch item's request, a Ray
    `ClientSpec`) keeps them so: no repr, str or pickle of it shows the credential.
    """
    return {
        name: Secret(value)
        if isinstance(value, str) and name.lower() == AUTHORIZATION.lower()
        else value
        for name, value in headers.items()
    }


def split_authorization(headers: dict[str, str]) -> tuple[dict[str, str], Secret | None]:
    """``headers`` without ``Authorization``, and that header's value as a `Secret`."""
    if AUTHORIZATION not in headers:
        return headers, None
    rest = dict(headers)
    return rest, Secret(rest.pop(AUTHORIZATION))


class Redactor:
    """Removes a call's credentials from every text a server (or a proxy) sent back.

    The one place where response-derived text is cleaned: bodies of any status, reason
    phrases, headers (``Location`` included), aiohttp's messages about the answer, and
    finally every text field of the error raised. Each credential is looked for as sent
    and as a server may echo it: JSON-escaped (``\\/`` for ``/``) and percent-encoded.
    The variants are built at the first use, which only a failure reaches.
    """

    __slots__ = ("_needles", "_secrets")

    MASK = "***"

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._secrets = tuple(secret for secret in secrets if secret)
        self._needles: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secrets)"

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def with_secrets(self, *secrets: str) -> Redactor:
        """This redactor with more credentials to remove."""
        return Redactor(self._secrets + secrets)

    def needles(self) -> tuple[str, ...]:
        """Every form of every credential that is removed, longest first."""
        if self._needles is None:
            forms: set[str] = set()
            for secret in self._secrets:
                escaped = json.dumps(secret)[1:-1]
                forms.update(
                    (
                        secret,
                        escaped,
                        escaped.replace("/", "\\/"),
                        urllib.parse.quote(secret, safe=""),
                        urllib.parse.quote(secret, safe="/"),
                        urllib.parse.quote_plus(secret),
                    )
                )
            self._needles = tuple(sorted(forms, key=len, reverse=True))
        return self._needles

    def text(self, text: str) -> str:
        """``text`` with every credential form replaced by ``***``."""
        for needle in self.needles():
            if needle in text:
                text = text.replace(needle, self.MASK)
        return text

    def data(self, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` (a body) with every credential form replaced by ``***``."""
        raw = bytes(data)
        for needle in self.needles():
            encoded = needle.encode()
            if encoded in raw:
                raw = raw.replace(encoded, self.MASK.encode())
        return raw

    def excerpt(self, body: bytes | bytearray | memoryview | str | None) -> str:
        """`excerpt` of ``body``, redacted before it is cut (no credential half-shown)."""
        if not body or not self._secrets:
            return excerpt(body)
        margin = max(len(needle) for needle in self.needles())
        window = EXCERPT_CHARS * 4 + margin
        if isinstance(body, str):
            text = body[:window]
        else:
            text = bytes(body[:window]).decode("utf-8", "replace")
        cut = len(body) > window
        text = self.text(text)
        if cut:
            # A credential cut by the window can only start in its last ``margin``
            # characters: drop them rather than show its first half.
            text = text[: max(0, len(text) - margin)]
        return excerpt(text)

    def contains(self, text: str) -> bool:
        """True when ``text`` holds a credential in any form."""
        return any(needle in text for needle in self.needles())

    def error(self, error: BaseException) -> BaseException:
        """Clean every text of ``error`` in place (message, args, body, headers, details).

        A chained exception (aiohttp's, about the answer) whose text holds a
        credential is cut off: it cannot be cleaned, and the error says what it said.
        """
        if not self._secrets:
            return error
        error.args = tuple(self._clean(arg) for arg in error.args)
        for name, value in vars(error).items():
            setattr(error, name, self._clean(value))
        for chained in (error.__cause__, error.__context__):
            if chained is not None and self.contains(f"{chained!r} {chained}"):
                error.__cause__ = None
                error.__context__ = None
                error.__suppress_context__ = True
                break
        return error

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, CIMultiDict):
            return CIMultiDict((self.text(k), self.text(v)) for k, v in value.items())
        if isinstance(value, dict):
            return {self._clean(k): self._clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._clean(item) for item in value]
        if isinstance(value, tuple):
            return tuple(self._clean(item) for item in value)
        return value
