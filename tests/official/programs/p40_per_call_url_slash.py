"""A per-call server_url ending in '/' reaches the API as the client-level one does."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    for url in (URL + "/", URL):
        try:
            res = friendli.container.image.generate(prompt="a kite", seed=1, server_url=url)
            print("ok:", len(res.image))
        except models.SDKError as e:
            print("SDKError:", e.status_code)
