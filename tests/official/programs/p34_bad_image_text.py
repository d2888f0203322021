"""An image string that is no image (bad base64 in a data: URI) is an SDKError 422."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.edit(
            image={"image": "data:image/png;base64,@@not-base64@@"}, prompt="p", server_url=URL
        )
        print("no error")
    except models.SDKError as e:
        print("status:", e.status_code)
