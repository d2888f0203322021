"""Official positional RetryConfig/BackoffStrategy per call: two 503s, then the image."""
# script: [Action.status(503), Action.status(503)]

import base64
import hashlib
import os

from friendli import SyncFriendli
from friendli.utils import BackoffStrategy, RetryConfig

URL = os.environ["IMAGE_SERVER_URL"]
retry = RetryConfig("backoff", BackoffStrategy(10, 100, 1.5, 20000), False)

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(
        prompt="a red kite", seed=3, retries=retry, server_url=URL
    )
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
