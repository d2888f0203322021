"""What one attempt saw on the wire: whether its connection was fresh, and how much body left.

The error mapping reads it to tell a stale keep-alive connection from a server failure, and
whether a request may have been processed (then it is not resent).
"""

from __future__ import annotations

__all__ = ["AttemptTrace"]


class AttemptTrace:
    """What the connector and the body reader saw of one attempt."""

    __slots__ = ("body_sent", "connected", "created")

    def __init__(self) -> None:
        self.connected = False
        self.created = False
        self.body_sent = 0

    @property
    def reused(self) -> bool:
        """The attempt went out on a pooled keep-alive connection."""
        return self.connected and not self.created

    def may_have_been_processed(self, body_size: int) -> bool:
        """Could the server have acted on the request? Not unless it got the whole body.

        The body is counted as it is handed to the connection, just *before* each write,
        so the count can only run ahead of the wire: below ``body_size`` the body was
        certainly not all sent.
        """
        return self.connected and self.body_sent >= body_size
