"""Values the OpenAPI file allows are sent; the server judges them."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

calls = [
    {"prompt": ""},
    {"prompt": "   "},
    {"prompt": "a kite", "model": ""},
    {"prompt": "a kite", "control_images": []},
    {"prompt": "a kite", "seed": 2**40},
    {"prompt": "a kite", "seed": -1},
]
with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    for kwargs in calls:
        try:
            res = friendli.container.image.generate(**kwargs, server_url=URL)
            print(sorted(kwargs), "ok", len(res.image))
        except models.SDKError as e:
            print(sorted(kwargs), "SDKError", e.status_code, e.body)
