"""A 307 to the same origin is followed with the same body, as httpx follows it."""
# script: [Action.status(307, headers={"Location": "/v1/images/generations"}, body=b"")]

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        res = friendli.container.image.generate(prompt="a kite", seed=2, server_url=URL)
        print("followed:", len(res.image))
    except models.SDKError as e:
        print("SDKError:", e.status_code)
