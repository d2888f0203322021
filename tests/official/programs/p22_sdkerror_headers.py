"""A 429 without retries: headers are read case-insensitively, as on httpx."""
# script: [Action.status(429, {"Retry-After": "7", "X-Custom": "abc"})]

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
    except models.SDKError as e:
        print("status:", e.status_code)
        print("retry-after:", e.headers.get("retry-after"), e.headers.get("Retry-After"))
        print("raw:", e.raw_response.headers["x-custom"], e.raw_response.status_code)
        print("body:", e.body)
