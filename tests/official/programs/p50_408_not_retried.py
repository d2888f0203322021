"""A 408 is not retried by default (the official statuses are 429, 5xx)."""
# script: [Action.status(408)]

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        res = friendli.container.image.generate(prompt="a kite", server_url=URL)
        print("retried:", len(res.image))
    except models.SDKError as e:
        print("not retried:", e.status_code)
