"""The official docs' error pattern: except models.FriendliCoreError around a failing call."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    for steps in (51, 10):
        try:
            res = friendli.container.image.generate(
                prompt="a boat", num_inference_steps=steps, server_url=URL
            )
            print("ok:", len(res.image) > 0)
        except models.FriendliCoreError as e:
            print("caught:", e.status_code, isinstance(e, models.SDKError))
            print("body is str:", isinstance(e.body, str))
