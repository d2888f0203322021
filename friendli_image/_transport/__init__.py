"""One attempt on the wire: POST, status check, capped read, decode, error translation.

`Transport` sends one prepared call once: it waits for a connection slot (so every
timer starts only once a connection is ours), posts the body, turns a non-200 status
into its `FriendliAPIStatusError`, reads the body under ``max_response_bytes``, decodes
the base64 image and builds the `ImageResult`. aiohttp, JSON and base64 exceptions are
translated here, and only here, into the ``FriendliError`` tree. Retrying is the
client's job (``_client``); nothing here sleeps or loops.

``_attempt`` sends (the connector, the attempt's trace and deadline, redirects);
``_proxy`` picks the route (proxy and ``.netrc`` from the environment, which credentials
follow a redirect); ``_decode`` reads and decodes a 200's body; ``_errors`` maps every
other outcome onto the error tree.
"""

from ._attempt import Call, Connector, Transport
from ._decode import BodyBuffers

__all__ = ["BodyBuffers", "Call", "Connector", "Transport"]
