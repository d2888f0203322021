"""Nothing listens: the official SDK raises httpx.ConnectError, ours a ConnectionError."""
# differs: connection-error — a refused connection is a builtin ConnectionError (FriendliConnectionError), not httpx's
# official-prints: caught: httpx.ConnectError
# ours-prints: caught: other, ConnectionError=True

import os

import httpx
from friendli import SyncFriendli, utils

DEAD = os.environ["DEAD_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(
            prompt="p",
            retries=utils.RetryConfig("none", utils.BackoffStrategy(1, 1, 1.0, 1), False),
            server_url=DEAD,
        )
    except httpx.ConnectError:
        print("caught: httpx.ConnectError")
    except Exception as e:
        print(f"caught: other, ConnectionError={isinstance(e, ConnectionError)}")
