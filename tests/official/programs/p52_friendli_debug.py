"""FRIENDLI_DEBUG=1 logs each request to stderr (and never the token)."""

import io
import os
import sys

os.environ["FRIENDLI_DEBUG"] = "1"

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]
TOKEN = "debug-token-secret-1234"
captured = io.StringIO()
real, sys.stderr = sys.stderr, captured
try:
    with SyncFriendli(token=TOKEN) as friendli:
        res = friendli.container.image.generate(prompt="a kite", seed=2, server_url=URL)
finally:
    sys.stderr = real
text = captured.getvalue()
print("logged the request:", "/v1/images/generations" in text)
print("token shown:", TOKEN in text)
