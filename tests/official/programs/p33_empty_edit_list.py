"""edit(image=[]) is an SDKError 422 (at least one image is required)."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.edit(image=[], prompt="nothing", server_url=URL)
        print("no error")
    except models.SDKError as e:
        print("status:", e.status_code)
