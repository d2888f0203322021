"""One 500, with the default retries: the official SDK sends the request again."""
# script: [Action.status(500)]
# differs: retry-500 — a 500 is not retried by default (it usually means this very input failed)
# official-prints: result: image
# ours-prints: result: SDKError 500

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(prompt="p", seed=1, server_url=URL)
        print("result: image")
    except models.SDKError as e:
        print("result: SDKError", e.status_code)
