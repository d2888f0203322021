"""status_codes_override=["5XX"]: a 500 is retried when the caller asks for it."""
# script: [Action.status(500)]

import base64
import hashlib
import os

from friendli import SyncFriendli
from friendli.utils import BackoffStrategy, RetryConfig

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(
        prompt="p",
        seed=1,
        retries=RetryConfig("backoff", BackoffStrategy(10, 100, 2.0, 20000), False, ["5XX"]),
        server_url=URL,
    )
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
