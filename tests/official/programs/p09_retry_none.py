"""RetryConfig("none", ...): the first 503 is the answer, an SDKError 503."""
# script: [Action.status(503)]

import os

from friendli import SyncFriendli, models, utils

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(
            prompt="p",
            retries=utils.RetryConfig("none", utils.BackoffStrategy(1, 1, 1.0, 1), False),
            server_url=URL,
        )
        print("no error")
    except models.SDKError as e:
        print("status:", e.status_code)
