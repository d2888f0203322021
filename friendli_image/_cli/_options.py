"""What every ``friendli-image`` command shares: exit codes and the client options."""

from __future__ import annotations

import argparse

from friendli_image._client import AsyncFriendli
from friendli_image._config import ENV_SERVER_URL, ENV_TOKEN

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "add_client_options",
    "make_client",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--server-url``, ``--timeout`` and ``--retries`` to a subcommand."""
    parser.add_argument(
        "--server-url",
        action="append",
        default=None,
        help=f"server base URL (default: ${ENV_SERVER_URL} or http://localhost:8000); "
        "give it more than once (or a comma-separated list) to balance over several "
        f"servers; the token is read from ${ENV_TOKEN}",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="per-attempt timeout"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        metavar="N",
        help="retries per request (default: the client's policy, 4; 0 disables retrying)",
    )


def make_client(args: argparse.Namespace) -> AsyncFriendli:
    """The client the command line asks for."""
    timeout_ms = None if args.timeout is None else int(args.timeout * 1000)
    urls: list[str] | None = args.server_url
    server_url = ",".join(urls) if urls else None
    return AsyncFriendli(server_url=server_url, timeout_ms=timeout_ms, retries=args.retries)
