"""What every ``friendli-image`` command shares: exit codes and the client options."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Final

from friendli_image._client import AsyncFriendli
from friendli_image._config import ENV_SERVER_URL, ENV_TOKEN
from friendli_image._exceptions import FriendliUsageError
from friendli_image._store import Location
from friendli_image._telemetry import Hooks

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "add_client_options",
    "make_client",
    "out_location",
    "out_uri",
    "token_from_args",
    "within",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

#: argparse's Path turns "s3://b/x" into "s3:/b/x"; the URI is put back together.
_COLLAPSED_URI: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
_URL: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def out_uri(value: object) -> str:
    """A path or URL argument as given (``s3://b/x``, not the ``s3:/b/x`` of a Path)."""
    return _COLLAPSED_URI.sub(r"\1://", str(value))


def out_location(value: str) -> Path | str:
    """``--out-dir`` as a batch takes it: a local path (``file://`` URLs included), or
    the URL of another fsspec file system (``s3://bucket/run``)."""
    if not _URL.match(value):
        return Path(value)
    uri = out_uri(value)
    try:
        location = Location(uri, {})
    except (ImportError, ValueError) as exc:
        raise FriendliUsageError(
            f"cannot open --out-dir {uri!r}: {exc}; a URL needs fsspec and the package of "
            "its file system (pip install fsspec s3fs, gcsfs, adlfs...)"
        ) from None
    return Path(location.root) if location.local else uri


def within(out_dir: Path | str, name: str) -> str:
    """Where the file ``name`` of an output location is: a path, or a URL."""
    return str(out_dir / name) if isinstance(out_dir, Path) else f"{out_dir.rstrip('/')}/{name}"


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Add the server, token, timeout and retry options to a subcommand."""
    group = parser.add_argument_group("server")
    group.add_argument(
        "--server-url",
        action="append",
        default=None,
        metavar="URL",
        help=f"the server's root URL, without /v1 (default: ${ENV_SERVER_URL} or "
        "http://localhost:8000); give it more than once (or a comma-separated list) to "
        "balance over several servers",
    )
    token = group.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        default=None,
        help=f"bearer token (default: ${ENV_TOKEN}); visible to other users in the process "
        "list, so prefer the variable or --token-file",
    )
    token.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="read the bearer token from FILE (surrounding whitespace is ignored)",
    )
    group.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="per-attempt timeout"
    )
    group.add_argument(
        "--retries",
        type=int,
        default=None,
        metavar="N",
        help="retries per request (default: the client's policy, 4; 0 disables retrying)",
    )


def token_from_args(args: argparse.Namespace) -> str | None:
    """The token --token or --token-file gives (None: FRIENDLI_TOKEN, read by the client)."""
    path: Path | None = args.token_file
    if path is None:
        token: str | None = args.token
        return token
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise FriendliUsageError(
            f"cannot read --token-file {str(path)!r}: {exc}; pass a readable text file "
            "holding the token"
        ) from None
    if not text:
        raise FriendliUsageError(f"--token-file {str(path)!r} is empty; write the token into it")
    return text


def make_client(args: argparse.Namespace, hooks: Hooks | None = None) -> AsyncFriendli:
    """The client the command line asks for (token: --token, --token-file, or the env)."""
    timeout_ms = None if args.timeout is None else int(args.timeout * 1000)
    urls: list[str] | None = args.server_url
    return AsyncFriendli(
        server_url=",".join(urls) if urls else None,
        token=token_from_args(args),
        timeout_ms=timeout_ms,
        retries=args.retries,
        hooks=hooks,
    )
