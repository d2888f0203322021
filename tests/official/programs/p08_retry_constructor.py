"""Official positional RetryConfig in the constructor (retry_config=): a 503, then the image."""
# script: [Action.status(503)]

import base64
import hashlib
import os

from friendli import SyncFriendli
from friendli.utils import BackoffStrategy, RetryConfig

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(
    token=os.environ["FRIENDLI_TOKEN"],
    retry_config=RetryConfig("backoff", BackoffStrategy(10, 100, 1.5, 20000), True),
) as friendli:
    res = friendli.container.image.generate(prompt="a red kite", seed=3, server_url=URL)
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
