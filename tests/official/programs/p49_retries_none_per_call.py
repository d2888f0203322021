"""retries=None on a call means no retries, as in the official SDK."""
# script: [Action.status(503)]

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        res = friendli.container.image.generate(prompt="a kite", retries=None, server_url=URL)
        print("retried:", len(res.image))
    except models.SDKError as e:
        print("not retried:", e.status_code)
