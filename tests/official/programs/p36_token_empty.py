"""token="" (what the seed snippets pass when FRIENDLI_TOKEN is unset) against an open server."""
# differs: empty-token — token="" sends no Authorization header; the official SDK sends "Bearer " and httpx refuses it
# official-prints: token '': LocalProtocolError
# ours-prints: token '': image

import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

try:
    with SyncFriendli(token="") as friendli:
        friendli.container.image.generate(prompt="no token", seed=1, server_url=URL)
    print("token '': image")
except Exception as e:
    print("token '':", type(e).__name__)
