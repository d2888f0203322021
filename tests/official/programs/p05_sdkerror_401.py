"""A wrong token: the server's 401 is an SDKError with the server's body and headers."""
# server: token=right-token

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token="wrong-token") as friendli:
    try:
        friendli.container.image.generate(prompt="p", server_url=URL)
    except models.SDKError as e:
        print("status:", e.status_code, e.raw_response.status_code)
        print("has detail:", "detail" in e.raw_response.text)
        print("content-type:", e.headers.get("Content-Type"))
        print("token echoed:", "wrong-token" in str(e))
