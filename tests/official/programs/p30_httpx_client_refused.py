"""client= (an httpx.Client) is refused with a usage error that says why."""
# differs: httpx-clients — client=/async_client= (httpx clients) are refused: the transport is aiohttp
# official-prints: client: accepted
# ours-prints: client: refused FriendliUsageError

import os

import httpx
from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

try:
    with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"], client=httpx.Client()) as friendli:
        friendli.container.image.generate(prompt="p", seed=1, server_url=URL)
    print("client: accepted")
except Exception as e:
    print("client: refused", type(e).__name__)
